"""Site configuration: a YAML site file parsed once into frozen objects.

See :mod:`ubicore.config.site` for the file format and :mod:`ubicore.config.model` for the
parsed objects. Every problem with a file is a :class:`~ubicore.errors.ConfigError` naming
the file and the key path.
"""

from ubicore.config.model import (
    PROTECTIONS,
    ROOT_CELL,
    CellConfig,
    CoreConfig,
    Deployment,
    HostConfig,
    InstancePlan,
    SiteConfig,
)
from ubicore.config.site import load_site, parse_site

__all__ = [
    "PROTECTIONS",
    "ROOT_CELL",
    "CellConfig",
    "CoreConfig",
    "Deployment",
    "HostConfig",
    "InstancePlan",
    "SiteConfig",
    "load_site",
    "parse_site",
]
