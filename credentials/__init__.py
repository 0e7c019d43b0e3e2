"""The service credential cache (``credentials.dat``), installed as ``ubicore.credentials``.

Empty until the service-credentials work lands (DESIGN.md §7); nothing imports it yet.
"""
