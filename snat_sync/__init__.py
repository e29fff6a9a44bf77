"""snat-sync: conntrackd state replication for keepalived HA routers."""
