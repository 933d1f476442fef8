"""Named DIMSE status codes used by the node (PS3.4 Annex B, PS3.7 Annex C)."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


def is_success_or_warning(status: int) -> bool:
    """Success (0x0000) or any Warning (0x0001, 0xB000-0xBFFF, 0x0107, 0x0116)."""
    return status == 0x0000 or (status >> 12) == 0xB or status in (0x0001, 0x0107, 0x0116)


def is_retryable_failure(status: int) -> bool:
    """Failures a later attempt may cure (the peer is out of resources)."""
    return (status >> 8) == 0xA7 or status == PROCESSING_FAILURE
