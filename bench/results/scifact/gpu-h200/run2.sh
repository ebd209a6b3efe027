#!/usr/bin/env bash
# SciFact on one GPU: mine once, then train/eval several recipes; results appended as each finishes.
# Ran when mpr train's default learning rate was 2e-5 (now 5e-5): runs that used that default pass it explicitly here.
DEADLINE=470
source "$(dirname "$0")/harness.sh"
run bixse-lr5 --loss bixse --learning-rate 5e-5 --save-steps 25
run bixse-lr5-llr1e-2 --loss bixse --learning-rate 5e-5 --loss-learning-rate 1e-2 --save-steps 25
run bixse-lr5-llr1e-1 --loss bixse --learning-rate 5e-5 --loss-learning-rate 1e-1 --save-steps 25
run lsepair-lr10 --loss lsepair --learning-rate 1e-4 --save-steps 25
run infonce-lr5 --loss infonce --learning-rate 5e-5 --save-steps 25
run infonce-lr2 --loss infonce --learning-rate 2e-5 --save-steps 25
run ws2-lr5 --loss ws2 --learning-rate 5e-5 --save-steps 25
el ALLDONE
