"""Webhooks: the outbound target policy, Standard Webhooks signing and the outbox
dispatcher."""
