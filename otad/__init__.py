"""otad: the OTA firmware-distribution daemon and its operator tools (the I/O side)."""
