"""The schema services ubicore ships, installed as ``ubicore.services``.

Core services: :mod:`.naming` (``UNaming::Registry``). Samples: :mod:`.configuration`
(``ULocationSystem::ConfigurationUpdate``) and :mod:`.positions` (``ULocation::Positions``).
"""
