"""Reads recorded webhook requests as JSON lines ({"headers": {...}, "body": "<base64>"}) on
stdin and prints, per request, what the CloudEvents SDK for Python (an implementation
independent of istream's) reads from it: the attributes and the data, as one JSON line."""
import base64, json, sys

from cloudevents.http import from_http

for line in sys.stdin:
    r = json.loads(line)
    event = from_http(r["headers"], base64.b64decode(r["body"]))
    attrs = {k: (v if isinstance(v, str) else str(v)) for k, v in event.get_attributes().items()}
    print(json.dumps({"attributes": attrs, "data": event.get_data()}))
