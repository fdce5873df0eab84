"""The SMTP protocol core: a sans-IO session, replies and address syntax."""
