"""The test bench, not the product: a namespace lab with two keepalived routers that
SNAT (`topology`), long-lived test flows and their verdicts (`flows`), and the
failover demo built on both (`demo`). The demo command, the functional tests and
bench/ import it; no product module does at import time (`snat-sync demo` imports
`demo` inside its subcommand only; tests/test_layout.py checks this).
"""
