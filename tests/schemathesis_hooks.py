"""schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

An Idempotency-Key names one logical request, so a client never sends one key
with two different bodies; when the fuzzer does, the API rightly answers 422
(idempotency_key_reused), which the fuzzer would read as a valid request
refused. Valid generated keys are therefore made unique per request; invalid
ones are left as generated, so their rejection is still checked. Reuse of a
key is tested on purpose in tests/test_idempotency.py.
"""

from __future__ import annotations

import re
import uuid

import schemathesis

_VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@schemathesis.hook
def before_call(ctx, case, kwargs):
    # before_call runs before every request of every phase (map_headers does
    # not reach the coverage phase).
    headers = case.headers
    if headers and _VALID_KEY.fullmatch(str(headers.get("Idempotency-Key", ""))):
        headers["Idempotency-Key"] = uuid.uuid4().hex
