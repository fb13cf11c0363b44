"""Storage tiers behind one protocol (see ``base.Tier``), fastest first:
memory -> ssd -> azcache -> blob (local directory, S3, or HTTP)."""
