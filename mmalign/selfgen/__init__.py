"""Preference data the models make themselves: ranked synthetic sets (`ranked.py`); STIC, BDHS and SPO pools to come."""
