"""Run the outer workflow; its step runs the inner one through the broker."""

from conveyor import BlockingClient

if __name__ == "__main__":
    with BlockingClient() as client:
        task_id = client.run_nowait("outer_workflow", arg1="hello_world")
        print(client.result(task_id))
        for task in client.list_tasks(service="inner_workflow"):
            if task["parent_task_id"] == task_id:
                print("inner task", task["task_id"], task["status"])
