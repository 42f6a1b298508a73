"""duplex on a Ray cluster: ``duplex serve --replicas N`` runs N agents (one per GPU) behind Ray
Serve's HTTP ingress. Ray is optional: ``pip install -e '.[cluster]'``; a single ``duplex serve``
needs none of this."""
