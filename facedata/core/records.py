"""Sample statuses as plain strings, for the code that writes and compares them (the values of
facedata.core.schema.Status, where each is declared with its step and meaning).

A sample is a row; a shard is a batch of rows. Every row that enters a shard leaves it with a
`status`: `ok`, or the first reason it was dropped. Steps add columns, they never drop rows.
"""

from __future__ import annotations

from facedata.core.schema import Status

OK = Status.OK.value
MISSING_URL = Status.MISSING_URL.value
INVALID_URL = Status.INVALID_URL.value
DUPLICATE_URL = Status.DUPLICATE_URL.value
FILE_NOT_FOUND = Status.FILE_NOT_FOUND.value
TIMEOUT = Status.TIMEOUT.value
CONNECTION_ERROR = Status.CONNECTION_ERROR.value
TOO_MANY_REDIRECTS = Status.TOO_MANY_REDIRECTS.value
TOO_LARGE = Status.TOO_LARGE.value
TRUNCATED = Status.TRUNCATED.value
NOT_IMAGE = Status.NOT_IMAGE.value
OPTED_OUT = Status.OPTED_OUT.value
DECODE_ERROR = Status.DECODE_ERROR.value
DECOMPRESSION_BOMB = Status.DECOMPRESSION_BOMB.value
TOO_SMALL = Status.TOO_SMALL.value
BAD_ASPECT = Status.BAD_ASPECT.value
NO_FACE = Status.NO_FACE.value
TOO_FEW_FACES = Status.TOO_FEW_FACES.value
TOO_MANY_FACES = Status.TOO_MANY_FACES.value
FACE_TOO_SMALL = Status.FACE_TOO_SMALL.value
FACE_RATIO_TOO_SMALL = Status.FACE_RATIO_TOO_SMALL.value
FACE_POSE = Status.FACE_POSE.value
OPTOUT_MATCH = Status.OPTOUT_MATCH.value
NEAR_DUPLICATE = Status.NEAR_DUPLICATE.value
IDENTITY_OUTLIER = Status.IDENTITY_OUTLIER.value
IDENTITY_CAP = Status.IDENTITY_CAP.value
SINGLETON_IDENTITY = Status.SINGLETON_IDENTITY.value
TOO_FEW_ATTRIBUTES = Status.TOO_FEW_ATTRIBUTES.value
LOW_RELEVANCE = Status.LOW_RELEVANCE.value


def http_status(code: int) -> str:
    """The status of a download the server answered with an HTTP error, e.g. "http_404"."""
    return f"http_{code}"
