"""Learning from a site's users: feedback in, the store, learn, gate (issue 12)."""
