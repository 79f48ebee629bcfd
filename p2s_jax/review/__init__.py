"""Review pages of machine-made masks: one card per person, decided by a person with the
keyboard in any browser, and the decisions applied as a curated copy."""
