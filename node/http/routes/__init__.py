"""The HTTP API's routers, one module per area; :func:`node.http.app.create_app` assembles them.

FastAPI reads the routes' annotations at run time, and ``Caller`` is local to each router: the
modules of this package keep their annotations as objects (no ``from __future__ import
annotations``).
"""
