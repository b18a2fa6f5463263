"""Verifies a Standard Webhooks delivery with the reference library (pip standardwebhooks):
argv[1] is the secret, stdin a JSON object {"headers": {...}, "body": "<text>"}; prints the
payload it verified, or exits 1 with the library's error."""
import json, sys

from standardwebhooks.webhooks import Webhook

r = json.load(sys.stdin)
try:
    payload = Webhook(sys.argv[1]).verify(r["body"], r["headers"])
except Exception as e:  # the library's WebhookVerificationError, printed for the test
    print(f"verification failed: {e}", file=sys.stderr)
    sys.exit(1)
print(json.dumps(payload))
