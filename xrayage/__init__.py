"""What every layer of the node shares and nothing else: a leaf that imports nothing of ``node``,
``ai`` or ``storage`` (so each of them may import it)."""
