"""Every `make bench` benchmark, the report that gathers them, and the fakes they share with tests."""
