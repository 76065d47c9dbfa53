"""DES of VNC authentication (dvmm_display.des) against FIPS 46 known answers
and an independent implementation (``cryptography``, OpenSSL's DES)."""

from __future__ import annotations

import warnings

import pytest
from dvmm_display.des import (
    check_response,
    des_encrypt_block,
    des_encrypt_ecb,
    new_challenge,
    vnc_key,
    vnc_response,
)
from hypothesis import given, settings
from hypothesis import strategies as st

TripleDES = pytest.importorskip("cryptography.hazmat.decrepit.ciphers.algorithms").TripleDES
modes = pytest.importorskip("cryptography.hazmat.primitives.ciphers.modes")
Cipher = pytest.importorskip("cryptography.hazmat.primitives.ciphers").Cipher


def reference(key: bytes, data: bytes) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # K1=K2=K3 is single DES
    out: bytes = enc.update(data) + enc.finalize()
    return out


@pytest.mark.parametrize(("key", "plain", "cipher"), [
    ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),  # the classic worked example
    ("0101010101010101", "95F8A5E5DD31D900", "8000000000000000"),  # NBS SP 500-20 variable text
    ("8001010101010101", "0000000000000000", "95A8D72813DAA94D"),  # variable key
    ("0E329232EA6D0D73", "8787878787878787", "0000000000000000"),
])
def test_known_answers(key: str, plain: str, cipher: str) -> None:
    assert des_encrypt_block(bytes.fromhex(key), bytes.fromhex(plain)) == bytes.fromhex(cipher)


@settings(deadline=None)
@given(st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=64).filter(
    lambda d: len(d) % 8 == 0))
def test_matches_openssl(key: bytes, data: bytes) -> None:
    assert des_encrypt_ecb(key, data) == reference(key, data)


def test_vnc_key_reverses_bits_and_pads() -> None:
    assert vnc_key(b"\x01\x80") == b"\x80\x01" + bytes(6)
    assert vnc_key(b"123456789") == vnc_key(b"12345678")  # only 8 bytes count


@settings(deadline=None, max_examples=50)
@given(st.binary(min_size=1, max_size=12))
def test_response_checks(password: bytes) -> None:
    challenge = new_challenge()
    answer = vnc_response(password, challenge)
    assert answer == reference(vnc_key(password), challenge)
    assert check_response(password, challenge, answer)
    assert not check_response(password + b"x" if len(password) < 8 else b"other",
                              challenge, answer)


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        des_encrypt_block(b"short", bytes(8))
    with pytest.raises(ValueError):
        des_encrypt_ecb(bytes(8), bytes(7))
