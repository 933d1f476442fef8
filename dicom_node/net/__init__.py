"""DICOM peer plumbing: the SCU (delivery, echo, send), TLS contexts and DIMSE statuses.

The receive side (Storage SCP, listener, ingest) is :mod:`dicom_node.receive`; nothing here
imports it.
"""
