//! The rolling upgrade of a live pool from Dovecot 2.3 to 2.4, as README's runbook says.
