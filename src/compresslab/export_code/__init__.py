"""Model code shipped inside exported folders (``trust_remote_code``); see
:mod:`compresslab.export`."""
