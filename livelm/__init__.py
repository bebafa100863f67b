"""LiveLM: a stateful inference daemon for streaming data and agents.

The distribution maps the top-level folders of the repository into this one namespace:
``livelm.daemon`` (daemon/), ``livelm.protocol`` (protocol/), ``livelm.native`` (native/)
and ``livelm.client`` (clients/python/).
"""

__version__ = "0.1.0"
