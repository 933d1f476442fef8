"""DICOM networking: the Storage SCP (listener) and the SCU (delivery, echo, send)."""
