//! One Dovecot 2.3 and one 2.4 backend behind one director, users on both.
