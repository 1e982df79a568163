# A log tree whose .log count the agent must find (plus files that must not be counted)
mkdir -p /var/log/app/api /var/log/app/worker/old
for i in 1 2 3; do echo "api $i" > /var/log/app/api/api-$i.log; done
for i in 1 2; do echo "worker $i" > /var/log/app/worker/worker-$i.log; done
echo "old" > /var/log/app/worker/old/worker-0.log
echo "not a log" > /var/log/app/README.txt
gzip -c /var/log/app/api/api-1.log > /var/log/app/api/api-0.log.gz
