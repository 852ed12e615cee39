"""mammo-node: the daemon, CLI, DICOM services, exam assembly, SR/SC building and export."""

__version__ = "0.2.0"
