"""The node's home directory: identity, keys, certificate, store location, user files.

Layout (all created by `edgegw internal init`):
    node.json              node id, store URL, files root
    ssh/host_*_key         SSH host keys (private; never leave the node)
    pnc/node.key           the node's PNC TLS key (private)
    pnc/node.crt           its certificate
    gateway-trust.pem      what the operator copies to the gateway (certificate only)
    edgegw.db              SQLite store (default)
    files/<user>/          default user homes
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import asyncssh
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CONFIG_NAME = "node.json"
HOST_KEY_ALGS = ("ssh-ed25519", "ecdsa-sha2-nistp256")
TLS_NAME = "edgegw-node"  # the name gateways expect in a node certificate's SAN
# what internal.store.open_store takes; checked before init writes anything
STORE_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+psycopg")
SQLITE_PREFIX = "sqlite:///"


class HomeError(Exception):
    """The home directory is missing, incomplete or unreadable; the message says how to fix it."""


def resolve_path(path: str | os.PathLike[str], what: str) -> Path:
    """`path` with `~` expanded, made absolute, symlinks resolved. pathlib raises RuntimeError
    for a `~user` that does not exist and (Python 3.11) for a symlink loop, ValueError for text
    the file system cannot take: each is one HomeError naming `what`, not a traceback."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError, ValueError) as exc:
        raise HomeError(f"cannot use {path} as {what}: {exc}") from None


@dataclass(frozen=True)
class NodeHome:
    path: Path
    node_id: str
    db_url: str
    files_root: Path

    @property
    def ssh_dir(self) -> Path:
        return self.path / "ssh"

    @property
    def tls_cert(self) -> Path:
        return self.path / "pnc" / "node.crt"

    @property
    def tls_key(self) -> Path:
        return self.path / "pnc" / "node.key"

    @property
    def trust_file(self) -> Path:
        return self.path / "gateway-trust.pem"

    def host_key_paths(self) -> list[Path]:
        """Host keys in preference order (newest first among the same algorithm)."""
        def newest(p: Path) -> tuple[float, str]:
            try:
                return p.stat().st_mtime, p.name
            except OSError:   # a dangling symlink, removed meanwhile: reading it says so
                return 0.0, p.name
        return sorted(self.ssh_dir.glob("host_*_key"), key=newest, reverse=True)

    def host_keys(self) -> list[asyncssh.SSHKey]:
        """The host keys to serve, in host_key_paths order; a clear error for an unreadable
        key or none at all."""
        keys = []
        for path in self.host_key_paths():
            try:
                keys.append(read_host_key(path))
            except UnreadableHostKey as exc:
                raise HomeError(f"{exc}; remove it with: edgegw internal hostkey remove "
                                f"--home {self.path} {path.name}") from None
        if not keys:
            raise HomeError(f"no SSH host keys in {self.ssh_dir}; create one with: "
                            f"edgegw internal hostkey rotate --home {self.path}")
        return keys

    def check_tls(self) -> None:
        """Load the PNC certificate and key as the gateway links will, naming the file at fault
        (ssl's own error says only "PEM lib")."""
        try:
            x509.load_pem_x509_certificate(self.tls_cert.read_bytes())
        except OSError as exc:
            raise HomeError(f"cannot read the PNC certificate {self.tls_cert}: "
                            f"{exc.strerror}") from None
        except ValueError:
            raise HomeError(f"the PNC certificate {self.tls_cert} is not a PEM certificate; "
                            "re-create the home (or sign a new one with your CA)") from None
        try:
            serialization.load_pem_private_key(self.tls_key.read_bytes(), None)
        except OSError as exc:
            raise HomeError(f"cannot read the PNC key {self.tls_key}: {exc.strerror}") from None
        except (ValueError, TypeError):   # TypeError: it needs a password
            raise HomeError(f"the PNC key {self.tls_key} is not an unencrypted PEM private "
                            "key; re-create the home") from None
        try:  # both parse: ssl still has to take them as a pair
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.tls_cert, self.tls_key)
        except OSError as exc:   # ssl.SSLError is one
            raise HomeError(f"cannot use the PNC certificate {self.tls_cert} with its key "
                            f"{self.tls_key}: {exc}") from None

    def user_home(self, username: str) -> Path:
        return self.files_root / username

    def unsafe_user_root(self, root: Path) -> str | None:
        """Why `root` may not be a user's root directory, or None. It may not hold the node home
        (its keys and store would be the user's to read) or the files root (every user's
        files), nor lie in the node home outside the files root."""
        root, node, files = root.resolve(), self.path.resolve(), self.files_root.resolve()
        if node.is_relative_to(root):
            return f"{root} holds the node home {node} (its keys and store)"
        if files.is_relative_to(root):
            return f"{root} holds the files root {files}, every user's files"
        if root.is_relative_to(node) and not root.is_relative_to(files):
            return f"{root} is inside the node home {node} but not under its files root {files}"
        return None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "NodeHome":
        root = resolve_path(path, "the node home")
        cfg_path = root / CONFIG_NAME
        try:
            cfg = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise HomeError(f"{root} is not an edgegw node home (no {CONFIG_NAME}); "
                            f"create one with: edgegw internal init --home {root}") from None
        except (OSError, ValueError) as exc:
            raise HomeError(f"cannot read {cfg_path}: {exc}") from None
        except RecursionError:
            raise HomeError(f"cannot read {cfg_path}: JSON nested too deeply") from None
        if not isinstance(cfg, dict):
            raise HomeError(f"{cfg_path} is not a JSON object; re-create the home")
        try:   # relative paths (hand-edited) are the home's, never the cwd's
            files = Path(cfg.get("files_root") or "files")
            try:
                files = files.expanduser()
            except RuntimeError as exc:   # a ~user that does not exist
                raise HomeError(f"{cfg_path}: field 'files_root': {exc}") from None
            home = cls(path=root, node_id=str(cfg["node_id"]),
                       db_url=_sqlite_under(str(cfg["db"]), root), files_root=root / files)
        except KeyError as exc:
            raise HomeError(f"{cfg_path} lacks field {exc}; re-create the home") from None
        except TypeError as exc:
            raise HomeError(f"{cfg_path} has a field of the wrong type ({exc}); "
                            "re-create the home") from None
        # a NUL byte reaches open() and sqlite as "embedded null byte", naming neither
        for name, value in (("node_id", home.node_id), ("db", home.db_url),
                            ("files_root", str(home.files_root))):
            if "\0" in value:
                raise HomeError(f"{cfg_path}: field {name!r} holds a NUL byte; fix it or "
                                "re-create the home")
        return home

    @classmethod
    def init(cls, path: str | os.PathLike[str], *, db_url: str | None = None,
             node_id: str | None = None, files_root: str | None = None,
             ca_dir: str | os.PathLike[str] | None = None,
             check_store: Callable[[str], None] | None = None) -> "NodeHome":
        """Create the home. Everything that can be refused (store URL, CA) is checked before
        anything is written; `check_store(url)` (open and migrate it) runs before node.json;
        on any failure what this call created is removed, so a retry starts clean."""
        root = resolve_path(path, "the node home")
        try:
            initialised = (root / CONFIG_NAME).exists()
        except OSError as exc:
            raise _home_error("read", exc, root / CONFIG_NAME) from None
        if initialised:
            raise HomeError(f"{root} is already initialised; pick another directory")
        node_id = node_id or f"node-{secrets.token_hex(4)}"
        # a relative SQLite path is the cwd's now: store it absolute, as later commands run
        # from anywhere
        db_url = _absolute_store_url(db_url) if db_url else f"{SQLITE_PREFIX}{root / 'edgegw.db'}"
        files = resolve_path(files_root, "the files root") if files_root else root / "files"
        ca = load_ca(Path(ca_dir)) if ca_dir else None
        undo = _Undo()
        try:
            undo.mkdir(root)
            undo.chmod(root, 0o700)
            undo.mkdir(files)
            undo.mkdir(root / "ssh", 0o700)
            undo.mkdir(root / "pnc", 0o700)
            if check_store is not None:   # before the keys: a refused store fails fast
                undo.store(db_url)
                check_store(db_url)
            for alg in HOST_KEY_ALGS:
                undo.files.append(write_host_key(root / "ssh", alg))
                undo.files.append(undo.files[-1].with_name(undo.files[-1].name + ".pub"))
            key_pem, cert_pem = make_node_certificate(node_id, ca=ca)
            undo.write(root / "pnc" / "node.key", key_pem, private=True)
            undo.write(root / "pnc" / "node.crt", cert_pem)
            # With a CA the gateway trusts the CA (one file for every node), else this node.
            undo.write(root / "gateway-trust.pem", ca[2] if ca else cert_pem)
            cfg = {"node_id": node_id, "db": db_url, "files_root": str(files)}
            # 0600: a PostgreSQL URL may carry a password (better: libpq's ~/.pgpass)
            undo.write(root / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode(),
                       private=True)
        except BaseException:
            undo.run()
            raise
        return cls.load(root)


class UnreadableHostKey(HomeError):
    """A host key file that cannot be read: damaged, a dangling link, not readable."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read host key {path}: {reason}")
        self.path, self.reason = path, reason


def read_host_key(path: Path) -> asyncssh.SSHKey:
    """One host key; UnreadableHostKey, naming the file and why, when it cannot be read."""
    try:
        return asyncssh.read_private_key(path)
    except Exception as exc:   # a damaged key: asyncssh's decoders raise ValueError,
        # UnicodeDecodeError, ASN1 errors... beyond KeyImportError
        raise UnreadableHostKey(path, getattr(exc, "strerror", None) or str(exc)) from None


def write_host_key(ssh_dir: Path, alg: str) -> Path:
    """Generate one SSH host key; a second key of the same algorithm gets a numbered name."""
    short = {"ssh-ed25519": "ed25519", "ecdsa-sha2-nistp256": "ecdsa", "ssh-rsa": "rsa"}[alg]
    path = ssh_dir / f"host_{short}_key"
    n = 1
    while path.exists():
        n += 1
        path = ssh_dir / f"host_{short}{n}_key"
    key = asyncssh.generate_private_key(alg, comment=f"edgegw host key {short}")
    pub = path.with_name(path.name + ".pub")
    try:
        _write_private(path, key.export_private_key())
        pub.write_bytes(key.export_public_key())
    except OSError as exc:
        if not isinstance(exc, FileExistsError):   # a part-written key, or one without .pub
            for p in (path, pub):
                p.unlink(missing_ok=True)
        raise _home_error("write host key", exc, path) from None
    return path


CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bytes]


def make_node_certificate(node_id: str, days: int = 3650,
                          ca: CA | None = None) -> tuple[bytes, bytes]:
    """A P-256 certificate for the PNC: self-signed (the node is its own trust anchor for the
    gateway) or, with `ca`, signed by the operator's CA so one trust file covers every node."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{TLS_NAME} {node_id}")])
    builder = _cert_builder(name, key, days).add_extension(
        x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
    if ca is None:
        cert = _as_anchor(builder).issuer_name(name).sign(key, hashes.SHA256())
    else:
        ca_key, ca_cert, _ = ca
        cert = (builder.issuer_name(ca_cert.subject)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def make_ca(directory: Path, name: str = "edgegw node CA", days: int = 3650) -> Path:
    """An operator CA (ca.key, ca.crt) for signing node certificates; keep ca.key offline."""
    try:
        exists = (directory / "ca.key").exists()
    except OSError as exc:
        raise _home_error("read", exc, directory / "ca.key") from None
    if exists:
        raise HomeError(f"{directory} already holds a CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = _as_anchor(_cert_builder(subject, key, days)).issuer_name(subject).sign(
        key, hashes.SHA256())
    undo = _Undo()
    try:   # a half-written CA would refuse the retry ("already holds a CA")
        undo.mkdir(directory)
        undo.write(directory / "ca.key", _key_pem(key), private=True)
        undo.write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    except BaseException:
        undo.run()
        raise
    return directory / "ca.crt"


def load_ca(directory: Path) -> CA:
    try:
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        cert_pem = (directory / "ca.crt").read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (OSError, ValueError, TypeError) as exc:
        raise HomeError(f"cannot load the CA in {directory} (ca.key, ca.crt): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HomeError(f"{directory}/ca.key is not an EC key made by `edgegw internal ca create`")
    return key, cert, cert_pem


def _cert_builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey,
                  days: int) -> x509.CertificateBuilder:
    now = _dt.datetime.now(_dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days)))


def _as_anchor(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    """Extensions that let OpenSSL accept the certificate as a trust anchor."""
    return (builder
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _home_error(what: str, exc: OSError, path: Path) -> HomeError:
    """One line naming the path (and the one at fault, when that is a parent)."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None and os.fsdecode(exc.filename) != str(path):
        reason = f"{os.fsdecode(exc.filename)}: {reason}"
    return HomeError(f"cannot {what} {path}: {reason}")


def _absolute_store_url(url: str) -> str:
    """`url` checked as open_store will take it; a SQLite path made absolute (cwd-relative)."""
    scheme = url.partition("://")[0].lower()
    if scheme not in STORE_SCHEMES:   # the scheme only: the rest may hold a password
        raise HomeError(f"unknown store URL scheme {scheme!r}: use sqlite:///PATH or "
                        "postgresql://USER@HOST/DB")
    if scheme != "sqlite":
        return url
    from internal.store import StoreError
    from internal.store.sqlite import sqlite_path
    try:
        return f"{SQLITE_PREFIX}{sqlite_path(url)}"
    except StoreError as exc:
        raise HomeError(str(exc)) from None


def _sqlite_under(url: str, root: Path) -> str:
    """A relative SQLite path in node.json resolved against the home `root`."""
    rel = url[len(SQLITE_PREFIX):] if url.startswith(SQLITE_PREFIX) else ""
    if not rel or rel == ":memory:" or rel.startswith("~") or Path(rel).is_absolute():
        return url   # not SQLite, absolute, or refused with its own message by open_store
    return f"{SQLITE_PREFIX}{root / rel}"


@dataclass
class _Undo:
    """What an init (or CA creation) created, removed again when it fails: never anything
    that existed before it started."""

    dirs: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    modes: list[tuple[Path, int]] = field(default_factory=list)

    def mkdir(self, path: Path, mode: int = 0o777) -> None:
        for d in (*reversed(path.parents), path):
            try:
                if d.is_dir():
                    continue
                d.mkdir(mode)
            except FileExistsError:
                if d.is_dir():  # created meanwhile by someone else: theirs
                    continue
                raise HomeError(f"cannot create directory {path}: {d} exists and is not a "
                                "directory") from None
            except OSError as exc:
                raise _home_error("create directory", exc, path) from None
            self.dirs.append(d)

    def chmod(self, path: Path, mode: int) -> None:
        try:
            old = path.stat().st_mode & 0o7777
            os.chmod(path, mode)
        except OSError as exc:
            raise _home_error("set the mode of", exc, path) from None
        self.modes.append((path, old))

    def write(self, path: Path, data: bytes, *, private: bool = False) -> None:
        try:
            if private:
                _write_private(path, data)
            else:   # O_EXCL: never write over (nor later remove) a file that was there
                with open(path, "xb") as f:
                    f.write(data)
        except FileExistsError as exc:
            raise _home_error("write", exc, path) from None
        except OSError as exc:
            self.files.append(path)   # created, then the write failed: ours to remove
            raise _home_error("write", exc, path) from None
        self.files.append(path)

    def store(self, db_url: str) -> None:
        """A SQLite store (and its journals) that opening it will create."""
        if not db_url.startswith(SQLITE_PREFIX):
            return   # a server store: its schema is harmless to keep
        db = Path(db_url[len(SQLITE_PREFIX):])
        for p in (db, *(db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal"))):
            if not os.path.lexists(p):
                self.files.append(p)

    def run(self) -> None:
        for f in reversed(self.files):
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass
        for path, mode in reversed(self.modes):
            try:
                os.chmod(path, mode)
            except OSError:
                pass
        for d in reversed(self.dirs):  # everything in a directory this call made is its own
            shutil.rmtree(d, ignore_errors=True)
