"""The host's copy of the guest tool ``blkverify``'s block pattern: moved to
:mod:`dvmm_core.guest.blkpattern` (the chaos campaigns use it too); re-exported
here for the tests."""

from dvmm_core.guest.blkpattern import (
    BLOCK,
    CRC_AT,
    MAGIC,
    WORDS,
    BadBlock,
    Summary,
    block,
    compare_image,
    parse_output,
    splitmix64,
)

__all__ = ["BLOCK", "CRC_AT", "MAGIC", "WORDS", "BadBlock", "Summary", "block",
           "compare_image", "parse_output", "splitmix64"]
