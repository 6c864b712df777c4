import hashlib
import os

from alignkit.runs import sha256_file


def test_sha256_file_is_fresh_after_a_same_size_rewrite(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"a" * 1000)
    assert sha256_file(p) == hashlib.sha256(b"a" * 1000).hexdigest()
    st = os.stat(p)
    p.write_bytes(b"b" * 1000)  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # even if the clock barely moved
    assert sha256_file(p) == hashlib.sha256(b"b" * 1000).hexdigest()
