"""medsim: medical image similarity — metric learning with attention, case retrieval, lesion localization."""

__version__ = "0.1.0"
