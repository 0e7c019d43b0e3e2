"""ubicore: cell-based schema services over ZeroMQ for sites full of sensors.

The public entry points are :mod:`ubicore.schema` (declare a schema),
:mod:`ubicore.client` (find, cache, follow and call services) and the ``ubi`` command.
"""

__version__ = "0.1.0"
