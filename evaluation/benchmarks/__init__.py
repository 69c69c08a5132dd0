"""Every `make bench` benchmark, the report that gathers them, and the fakes and synthetic
traffic they share with the tests."""
