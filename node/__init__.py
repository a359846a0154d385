"""The DICOM node: networking, acceptance rules, reports, delivery, service and CLI."""
