"""Query audits and database health (the queries capability's package; its public API is
declared where the audit lives)."""
