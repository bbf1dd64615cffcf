"""One child-process driver per adapter, all with the command line of `common.parse_args`."""
