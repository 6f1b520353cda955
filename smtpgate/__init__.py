"""smtpgate: an SMTP gateway that turns monitoring alerts and customer mail into tickets."""

__version__ = "0.1.0"
