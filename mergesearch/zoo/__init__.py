"""The demo model zoo: synthetic skills, a tiny base model and one expert per skill."""
