"""medsim.viz: pictures a person can look at (contact sheets, overlays)."""
