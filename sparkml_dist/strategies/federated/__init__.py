"""Federated learning over Spark: clients are the groups of a key column (or the partitions of a
DataFrame), rounds are ordinary Spark stages, the driver is the server.

Pure math lives in one module per algorithm (``fedavg``, ``fedprox``, ``fedopt``, ``privacy``,
``field``, ``secagg``, ``dirichlet``), each naming its paper; ``client`` is what one Spark task
does for one client; ``driver`` runs the rounds. The entry point is
:func:`sparkml_dist.strategies.federated.driver.fit_federated`.
"""
