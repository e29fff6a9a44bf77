"""snat-sync: conntrackd state replication for keepalived HA routers.

Data flows one way: options and spec (options, router, roles) -> rendered files
(render, statedir) -> running conntrackd (conntrackd, namespace, guard, manager)
-> transitions (failover, history, watcher) -> health (health, repair, reports,
metrics). The node daemon is daemon.py's loop and its rooms (see its docstring);
cli and neutron_extension are the ways in; lab/ is the test bench. Start reading
at manager.add_router. README's Development section has the table.
"""
