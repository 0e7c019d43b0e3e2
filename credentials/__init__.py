"""The service credential cache (``credentials.dat``), installed as ``ubicore.credentials``.

Per site, what a service user's key exchange needs instead of a password (DESIGN.md §7);
the format and the file handling are in :mod:`ubicore.credentials.cache`.
"""

from .cache import (
    FILE_NAME,
    FORMAT_VERSION,
    CachedCredential,
    CredentialsDamaged,
    CredentialsError,
    CredentialsMissing,
    CredentialsUnsafe,
    cache_path,
    check_file,
    copy_cache,
    load_credential,
    read_cache,
    remove_credential,
    store_credential,
    write_cache,
)

__all__ = [
    "FILE_NAME",
    "FORMAT_VERSION",
    "CachedCredential",
    "CredentialsDamaged",
    "CredentialsError",
    "CredentialsMissing",
    "CredentialsUnsafe",
    "cache_path",
    "check_file",
    "copy_cache",
    "load_credential",
    "read_cache",
    "remove_credential",
    "store_credential",
    "write_cache",
]
