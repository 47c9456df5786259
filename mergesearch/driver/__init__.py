"""The search driver: study files, the ask/tell loop, storage, and reports of what a study found."""
