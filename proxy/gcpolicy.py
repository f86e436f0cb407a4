"""The garbage collector's settings for a long-running `triaged serve` process.

CPython's cycle collector scans its oldest generation from time to time
(every 10 collections of the middle one, when enough new objects survived):
every module, class, function and constant imported at start, tens of
thousands of objects that live as long as the process. Measured on the SMTP
proxy at ~1,500 msg/s (bench/results/cpu_profile.md): collections took about
34 us per message, half of it in those full scans; with the start-up heap
frozen (`gc.freeze()`, Python 3.7+) they took about 18 us.

Frozen objects are never scanned, and never freed, which is what they would
be anyway; the collection first drops whatever start-up left behind. After a
fork the frozen pages are not written by a collection either (copy-on-write
stays shared), which is why the Python docs suggest it before forking workers.
The thresholds are left as they are: a larger young generation would keep
cyclic garbage, message buffers included, alive for longer.
"""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect once and freeze what is left: call when start-up is done
    (modules imported, configuration loaded), and again after the server
    is up if it created many long-lived objects."""
    gc.collect()
    gc.freeze()
