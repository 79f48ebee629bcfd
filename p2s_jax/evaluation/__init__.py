"""Dataset evaluation: the data-parallel runner, COCOeval mask AP, run reports."""
