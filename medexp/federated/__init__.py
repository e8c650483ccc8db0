"""Federated learning, simulated: one model trained over several sites without pooling their data.

``medexp federate`` (:mod:`medexp.federate`) runs the rounds in one process:

- :mod:`medexp.federated.sites`: which samples each simulated site holds (the data's own ``site``
  column, an IID split, or a Dirichlet label skew), for the train, val and test splits alike;
- :mod:`medexp.federated.local`: a site's local update (a fresh Lightning Trainer fitting the
  global weights on the site's training samples) and FedProx's proximal term;
- :mod:`medexp.federated.aggregate`: the server's sample-weighted average of the sites' weights;
- :mod:`medexp.federated.simulation`: the rounds, per-site and global evaluation, the history.

How this maps to a real multi-institution deployment: what one local update does here runs at
each hospital, next to its data; only model weights (and each site's sample count) travel to the
server and back, never images or labels. The server only averages. Secure aggregation and
differential privacy are not part of this simulation; the production path is a federated
framework (Flower, NVIDIA FLARE) whose client runs the same local update.
"""
