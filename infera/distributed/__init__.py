"""Engine replicas on Ray (``infera serve --data-parallel-size N``): :mod:`.replica` is the actor
holding one engine, :mod:`.replica_pool` the server's front over them.  Importing this package does
not import Ray; its modules do."""
