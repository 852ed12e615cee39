"""DICOM status codes the node answers and reads: one vocabulary for every module.

PS3.4 (service-specific: C-STORE B.2.3, C-FIND C.4.1.1.4, C-MOVE / C-GET C.4.2.1.5 / C.4.3.1.4)
and PS3.7 C (general). Names follow pynetdicom's ``status`` tables.
"""

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # pending, some optional keys not supported
CANCELLED = 0xFE00
NOT_AUTHORIZED = 0x0124  # general: refused, not authorized (PS3.7 C.5.21)
OUT_OF_RESOURCES = 0xA700  # storage: refused, out of resources
DATASET_MISMATCH = 0xA900  # storage: dataset does not match SOP class
IDENTIFIER_MISMATCH = 0xA900  # Q/R: identifier does not match SOP class
MOVE_DEST_UNKNOWN = 0xA801  # C-MOVE: move destination unknown
CANNOT_UNDERSTAND = 0xC210  # storage: error, cannot understand
PROCESSING_FAILURE = 0xC211  # storage: our own failure
UNABLE_TO_PROCESS = 0xC000  # Q/R: unable to process
#: C-STORE answers that mean the object is stored: success and the storage warnings
#: (coercion of data elements 0xB000, elements discarded 0xB007, data set does not match
#: SOP class 0xB006).
STORED = frozenset({SUCCESS, 0xB000, 0xB006, 0xB007})
