"""The one path from spec to kernel: the reconciler, the snapshot it returns,
the counter ledger, and the TZSP taps it keeps running.

    spec + topology -> plan -> render -> compare with the kernel -> apply -> snapshot

Start-up, SIGHUP, every heal and every TZSP tap restart go through
`Reconciler.reconcile`; status and health read the `Snapshot` it returned and
a `Reading` of the counters, never the reconciler's insides.
"""
