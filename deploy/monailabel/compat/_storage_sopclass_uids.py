"""pydicom 2's ``pydicom._storage_sopclass_uids`` for pydicom-seg 0.4.1 under pydicom 3, where these UIDs live in
``pydicom.uid``. deploy/monailabel/install.sh copies this file into the MONAI Label environment's pydicom package
(only there): MONAI Label imports pydicom-seg when it starts, and medsim's runtime needs pydicom 3."""

from pydicom.uid import *  # noqa: F401,F403 - every *Storage UID, as pydicom 2 exported them here
