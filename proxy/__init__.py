"""triaged's server: SMTP proxy (and later milter) front ends, pipeline, events."""
